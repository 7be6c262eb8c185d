"""Pure scheduling logic: performance models, placement, admission (SLS), mini-batch split, plans.

No I/O, no asyncio, no torch: plain objects in, plain objects out, deterministic.
The Executor drives ``Scheduler`` once per step; ``plan_deployment`` backs ``fdctl plan``;
``python -m fastdecode.scheduler.simulate`` compares admission modes.
"""
from fastdecode.scheduler.attend_calls import AttendCall
from fastdecode.scheduler.config import SchedulerConfig
from fastdecode.scheduler.decisions import Admission, Preemption, StepPlan
from fastdecode.scheduler.gpu_profile import GPU_SPECS, GpuProfile, GpuSpec
from fastdecode.scheduler.model_shape import ModelShape
from fastdecode.scheduler.node import NodeModel
from fastdecode.scheduler.perf_model import GpuPerfModel, ShardPerfModel
from fastdecode.scheduler.plan import PlanError, PlanRequest, PlanResult, plan_deployment
from fastdecode.scheduler.scheduler import Scheduler

__all__ = [
    "GPU_SPECS",
    "Admission",
    "AttendCall",
    "GpuPerfModel",
    "GpuProfile",
    "GpuSpec",
    "ModelShape",
    "NodeModel",
    "PlanError",
    "PlanRequest",
    "PlanResult",
    "Preemption",
    "Scheduler",
    "SchedulerConfig",
    "ShardPerfModel",
    "StepPlan",
    "plan_deployment",
]
