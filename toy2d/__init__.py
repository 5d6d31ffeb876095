"""The toy world: a 2-D Gaussian-mixture teacher with exact scores, MLP adapters, analytic rewards, metrics, plots."""

from .metrics import energy_distance, energy_floor, max_relative_mass_error, mode_masses, modes_covered, off_manifold_fraction
from .mixture import MIXTURES, PATHS, GaussianMixture, make_mixture, path_alpha
from .plots import draw_samples, plot_curves, plot_samples
from .rewards import REWARDS, Reward
from .world import ROLES, Adapter, ToyWorld

__all__ = [
    "MIXTURES", "PATHS", "REWARDS", "ROLES", "Adapter", "GaussianMixture", "Reward", "ToyWorld", "draw_samples",
    "energy_distance", "energy_floor", "make_mixture", "max_relative_mass_error", "mode_masses", "modes_covered",
    "off_manifold_fraction", "path_alpha", "plot_curves", "plot_samples",
]
