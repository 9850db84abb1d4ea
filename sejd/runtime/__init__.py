from sejd.runtime.plan import BlockPlan, Plan, named_plan, resolve_plan
from sejd.runtime.runner import BlockRunner, Conditioning
from sejd.runtime.sampler import SampleResult, sample

__all__ = ["BlockPlan", "BlockRunner", "Conditioning", "Plan", "SampleResult", "named_plan", "resolve_plan", "sample"]
