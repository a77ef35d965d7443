"""Using and shipping a trained model: loading it with any checkpoint's adapter (`inference`), the chat
process and its torch-free client (`chat_server`, `chat_client`), held-out examples and before/after
evaluation (`heldout`, `evaluate`), the run's curves as a picture (`plot`), and exports: adapter, merged
model, GGUF with its vocabulary and Ollama Modelfile, each verified after writing (`export`,
`gguf_export`, `gguf_vocab`, `modelfile`, `export_check`)."""
