"""Cluster side of mmae: the Ray Train driver (`entry`), the per-worker function (`worker`), the Ray Train + MLflow
`Reporter` (`reporter`), MLflow run bookkeeping (`tracking`) and local mode (`local.run_local`).

Importing this package imports nothing heavy; torch, ray and mlflow are imported by the submodules that need them.
"""
