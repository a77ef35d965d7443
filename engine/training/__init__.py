"""Training: finding, downloading and loading the model (`models`, `download`), the LoRA/QLoRA trainer
(`trainer`, with preference pairs through trl in `preference`), its checkpoint sealing (`sealing`) and
out-of-memory recovery (`oom`), several GPUs (`distributed`), the speed levers (`speed`, with the fused LoRA blocks
`fused_lora`, their Triton kernels `swiglu_triton` and `nf4_triton`, the Triton norm and rotary embedding
`rmsnorm_triton` and `rope_triton`, and `offload_checkpoint`), the one-step memory probe (`probe_step`) and
the greedy samples shown while a run trains (`generate`). Only the engine process and heavy CLI commands
import these: they pull in torch and transformers."""
