"""`vllm-train service`: a training service that speaks the Tinker API (the `tinker` SDK runs against it
unmodified). Many tenants' LoRA adapters train on one base model; each is served by vLLM the moment it
steps."""
