//! Fine-tuning (feature `train`): LoRA adapters over the frozen quantized base ([`lora`]), their files in Hugging
//! Face PEFT's format and the fold into a GGUF ([`peft`]), and the differentiable forward pass the trainer
//! optimises them with ([`finetune`]), with its frozen Q8_0 products on AVX-512 VNNI ([`tiles`]).

pub mod finetune;
pub mod lora;
pub mod peft;
pub mod tiles;
