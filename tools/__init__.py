"""Project tools that are not pipeline stages: profiles, the reproducibility gate."""
