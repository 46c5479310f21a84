"""Flow-matching math: the path, its views, training times, the shift and the samplers.

Every formula lives here once; docs/design.md ("Math conventions") states them.
"""

from jdiff.diffusion import grpo
from jdiff.diffusion.flow import (
    PREDICTIONS,
    VIEWS,
    WEIGHTINGS,
    convert,
    flow_loss,
    from_x0_eps,
    interpolate,
    loss_weight,
    to_x0_eps,
    velocity_target,
)
from jdiff.diffusion.preference import dpo_loss
from jdiff.diffusion.distill import (cfg_target, few_step_grid, few_step_target, guidance_distillation_loss,
                                     ode_state, student_states, velocity_error)
from jdiff.diffusion.sampling import METHODS, embedded_guidance_velocity, guided_velocity, sample, solve
from jdiff.diffusion.timesteps import (
    SHIFT_KINDS,
    TIMESTEP_KINDS,
    inference_times,
    resolution_shift,
    sample_timesteps,
    sampling_times,
    time_shift,
    training_timesteps,
)

__all__ = [
    "grpo",
    "PREDICTIONS", "VIEWS", "WEIGHTINGS", "METHODS", "SHIFT_KINDS", "TIMESTEP_KINDS",
    "convert", "flow_loss", "from_x0_eps", "interpolate", "loss_weight", "to_x0_eps",
    "velocity_target", "dpo_loss", "cfg_target", "guidance_distillation_loss", "few_step_grid",
    "few_step_target", "ode_state", "student_states", "velocity_error", "embedded_guidance_velocity",
    "guided_velocity", "sample", "solve", "inference_times",
    "resolution_shift", "sample_timesteps", "sampling_times", "time_shift", "training_timesteps",
]
