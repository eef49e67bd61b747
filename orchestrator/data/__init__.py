"""`mmae data ...` command implementations: synth, inspect, import-folder, pseudolabel (imported by the CLI inside
command bodies; may import numpy, PIL, fsspec, torch and ray)."""
