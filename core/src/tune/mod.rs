//! Fine-tuning (feature `train`): LoRA adapters over the frozen quantized base ([`lora`]), their files in Hugging
//! Face PEFT's format and the fold into a GGUF ([`peft`]), and the differentiable forward pass the trainer
//! optimises them with ([`finetune`]), with its frozen Q8_0 products on AVX-512 VNNI ([`tiles`]) and its element-wise
//! layers as single ops with hand-written gradients ([`fused`]).

pub mod finetune;
pub mod fused;
pub mod lora;
pub mod peft;
pub mod tiles;
