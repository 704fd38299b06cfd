"""Bernoulli diffusion core: plain tensor functions, no nn.Module, no distributed code."""

from .bernoulli import (
    aux_posterior_loss,
    bernoulli,
    diffusion_loss,
    draw_times,
    flip_loss,
    flip_prob,
    p_step_prob,
    posterior_one,
    q_sample,
    q_step_sample,
    training_example,
    z0_prob_from_flip_logits,
)
from .sampler import check_guidance_interval, guided_logits, posterior_table, sample, step_prob
from .schedule import SCHEDULES, keep_factors, sampling_times

__all__ = [
    "SCHEDULES",
    "aux_posterior_loss",
    "bernoulli",
    "check_guidance_interval",
    "diffusion_loss",
    "draw_times",
    "flip_loss",
    "flip_prob",
    "guided_logits",
    "keep_factors",
    "p_step_prob",
    "posterior_one",
    "posterior_table",
    "q_sample",
    "q_step_sample",
    "sample",
    "sampling_times",
    "step_prob",
    "training_example",
    "z0_prob_from_flip_logits",
]
