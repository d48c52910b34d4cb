//! Fine-tuning (feature `train`): LoRA adapters over the frozen quantized base ([`lora`]), their files in Hugging
//! Face PEFT's format and the fold into a GGUF ([`peft`]), and the differentiable forward pass the trainer
//! optimises them with ([`finetune`]).

pub mod finetune;
pub mod lora;
pub mod peft;
