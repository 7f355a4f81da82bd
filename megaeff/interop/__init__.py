"""Interoperability with Hugging Face `transformers` (imported lazily: megaeff runs without it).

names.py            logical megaeff names <-> Hugging Face LLaMA tensor names
safetensors_io.py   sharded safetensors writing, lazy reading by logical name
layers.py           one projection at a time, built and initialized as in training; its dense weight
hf_export.py        logical state + config -> a LlamaForCausalLM directory (`megaeff-convert hf-export`)
hf_import.py        a LlamaForCausalLM directory -> the logical state of any method (`model.init_from`)
hf_tokenizer.py     the training tokenizer written into the export
modeling_megaeff_lost.py  shipped inside LOST (f = silu) exports; not imported by megaeff
"""
