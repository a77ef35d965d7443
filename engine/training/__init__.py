"""Training: loading the model (`models`), the LoRA/QLoRA trainer (`trainer`), several GPUs
(`distributed`), the speed levers (`speed`, `fused_lora`, `swiglu_triton`), the one-step memory probe
(`probe_step`) and the greedy samples shown while a run trains (`generate`). Only the engine process and
heavy CLI commands import these: they pull in torch and transformers."""
