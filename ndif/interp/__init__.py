"""Building blocks for steering and reading a model: steering vectors, SAEs, probes, and a
declarative layer (`Recipe`) that compiles to ordinary interventions. They work inside any
trace, local or remote, on the transformers and vLLM backends alike."""

from .files import load, load_probe, load_sae, load_vector, save_probe, save_sae, save_vector
from .generation import Generation, Step, generate_with
from .probes import LinearProbe
from .recipes import EditFeatures, LogitLens, ReadFeatures, ReadNorm, ReadProbe, Recipe, Steer
from .sae import SAE
from .stream import add_to_stream, decoder_layers, logit_lens, read_stream, write_stream
from .vectors import SteeringVector, contrast_vector, principal_direction, stream_activations

__all__ = [
    "SAE",
    "EditFeatures",
    "Generation",
    "LinearProbe",
    "LogitLens",
    "ReadFeatures",
    "ReadNorm",
    "ReadProbe",
    "Recipe",
    "Steer",
    "SteeringVector",
    "Step",
    "add_to_stream",
    "contrast_vector",
    "decoder_layers",
    "generate_with",
    "load",
    "load_probe",
    "load_sae",
    "load_vector",
    "logit_lens",
    "principal_direction",
    "read_stream",
    "save_probe",
    "save_sae",
    "save_vector",
    "stream_activations",
    "write_stream",
]
