"""Everything that writes a model out for use elsewhere, in one package; families only describe what is written
(:mod:`distgen.families.capabilities`: ``OnnxGraph``, ``DiffusersPipeline``) and never import it.

- :mod:`distgen.export.native`: ``distgen export`` (the family's standard format and ``distgen.json``);
- :mod:`distgen.export.meta`: ``distgen.json``, read back by ``distgen sample`` / ``eval`` and ``export --force``;
- :mod:`distgen.export.pipelines`: the diffusers pipelines distgen ships in its exports;
- :mod:`distgen.export.onnx`: ``--format onnx``, the graphs checked against PyTorch;
- :mod:`distgen.export.sample_onnx`: the standalone numpy + onnxruntime sampler copied into an ONNX export (one
  self-contained file by design).
"""
