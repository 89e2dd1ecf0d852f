"""ndif's job service: the HTTP API, the job store, the Celery queue and the object store.

Modules: `config` (settings from ``NDIF_*`` variables or a TOML file), `db` (SQLAlchemy
models), `store` (guarded status changes), `storage` (S3 or a local directory),
`auth` (API keys), `quotas`, `api` (FastAPI), `queue` (Celery app and tasks),
`dispatch` (running a job on a model actor), `stack` (the embedded one-machine stack).
"""

__version__ = "0.1.0"
