"""Three-stage distillation from the frozen teacher (LINMU.md §5)."""
