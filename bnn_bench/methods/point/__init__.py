"""Point estimates and their ensembles: MAP, a deep ensemble, vote ensembles."""
