"""The DEDN model, its naive reference form, its losses, and loading the released code's checkpoints."""
