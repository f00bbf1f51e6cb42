"""``kinoe convert``: DeepSpeed checkpoints to verified Hugging Face model directories, and back.

``config`` holds ``ConvertConfig``; ``sources`` the weights to convert, read one tensor at a
time (``consolidate`` from DeepSpeed ZeRO shards, ``initial`` from a kinoe weights directory,
``hf_read`` from a Hugging Face directory); ``safetensors_shards`` writes sharded safetensors
files tensor by tensor; ``hf_write`` the Hugging Face directory, with ``experts`` for
Mixtral's per-expert layout; ``verify`` compares our model with the converted one on
``texts``; ``cli`` runs the steps ``to-hf``, ``verify`` and ``from-hf``. docs/convert.md.
"""
