"""The training skeleton shared by every recipe: back-ends (plain PyTorch, DDP, DeepSpeed ZeRO),
checkpoints with exact resume, and the epoch loop (setup -> train -> save -> cleanup)."""
