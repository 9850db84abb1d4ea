from sejd.model.tarflow import Model, TarFlow, TarFlowConfig

__all__ = ["Model", "TarFlow", "TarFlowConfig"]
