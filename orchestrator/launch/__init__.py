"""Cloud launches: a job as a SkyPilot task (`sky`), the one boundary to SkyPilot's API (`boundary`), and the
status join of MLflow runs with clusters and managed jobs (`status`). Nothing here is imported at CLI start-up."""
