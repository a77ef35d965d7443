"""Planning: what this machine has (`hardware`, built on NVML, host and library probes), what a run will
need (`estimator`, peak GPU memory itemised) and what to train on it (`recommend`, ranked choices of
model, method and settings). Cheap to import: no torch at import time, so the app and light CLI
commands can plan without loading the training stack."""
