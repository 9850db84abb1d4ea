from sejd.model.tarflow import TarFlow, TarFlowConfig

__all__ = ["TarFlow", "TarFlowConfig"]
