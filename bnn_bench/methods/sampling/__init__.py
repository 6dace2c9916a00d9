"""The samplers, on one template (``Sampler``): SG-MCMC (``sgld``, ``psgld``, ``sghmc``) and
full-batch HMC, with their kernels and step-size schedules."""
