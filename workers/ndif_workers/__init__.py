"""ndif's model workers: Ray actors that hold a model and run sandboxed traces on it.

`registry` reads the deployments file, `actor` is the Ray actor (`ModelActor`),
`backends` loads a deployment's model, and `serve` starts and watches the actors
(``ndif-workers serve``).
"""

__version__ = "0.1.0"
