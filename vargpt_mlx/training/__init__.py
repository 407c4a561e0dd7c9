"""On-device fine-tuning of VARGPT-v1.1: LoRA SFT and DPO.

* ``data``: the sharegpt training format, up-front validation, the training template, targets;
* ``losses``: upstream's SFT losses and the per-sample losses / log-probs the trainer uses;
* ``lora``: LoRA layers (mlx-lm's ``LoRALinear``), ``load_adapters`` (``--adapter-path``), fusing;
* ``sft`` / ``dpo``: the two training tasks; ``trainer``: the loop, checkpoints, resume;
* ``callbacks``: the loop's typed progress events (``TrainingCallback``, ``StepInfo``);
* ``run``: assembling a run from files; ``fuse``: writing a standalone fused model directory.
"""
