"""Dataset loading, format detection, chat rendering and label masking (shared by training and checks)."""
