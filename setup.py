from setuptools import find_packages, setup

setup(
    name="mindflux",
    version="0.1.0",
    description="FLUX.1 (diffusers-compatible) text-to-image inference and LoRA training on MindSpore",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.9,<3.12",
    packages=find_packages(include=["mindflux", "mindflux.*"]),
    # the demo pipeline (trained by train/train_demo_model.py) and the DreamBooth demo's instance images
    package_data={"mindflux.demo": ["flux-shapes/*.json", "flux-shapes/*/*", "ring/*.png"]},
    install_requires=[
        "mindspore>=2.7.1",
        "numpy>=1.20,<2",  # numpy 2 breaks MindSpore 2.7
        "safetensors",
        "huggingface_hub>=0.34,<1.0",  # repo ids in from_pretrained (snapshot_download, its cache, HF_ENDPOINT)
        "ml_dtypes>=0.4",  # fp8 (F8_E4M3 / F8_E5M2) checkpoints widened at load; MindSpore does not bring it
        "transformers>=4.57,<4.58",  # tokenizers and configs only; never its torch models
        "tqdm",
        "pillow",
        "ftfy",  # CLIPTokenizer's text cleaning; without it transformers falls back to a BERT tokenizer
        "sentencepiece",  # T5 tokenizer: its slow form (spiece.model) is saved with the pipeline
        "protobuf",
    ],
    extras_require={
        # TensorBoard logging; the GGUF fixtures' reader; LoRA interop with mindone (tests/test_lora_mindone.py);
        # --dataset_name through the datasets library (tests/test_train_datasets.py)
        "test": ["pytest", "tensorboardX", "gguf==0.19.0", "mindone==0.5.0", "datasets==5.0.1", "pyarrow<26"],
        # only to regenerate the PyTorch reference dumps (tests/parity/make_dumps.py) and run bench/
        "torch": ["torch==2.13.0", "diffusers==0.35.2", "peft", "sentencepiece", "protobuf", "prodigyopt"],
        "gguf": ["gguf>=0.17"],  # GGUF transformer files (Q8_0, Q4_K, ...), dequantised at load
        "mindone": ["mindone==0.5.0"],
        "tensorboard": ["tensorboardX"],  # train --report_to tensorboard: pure Python, needs protobuf and numpy
        # train --dataset_name with a Hub id or any folder the library reads; pyarrow 26 needs numpy 2 (undeclared)
        "datasets": ["datasets", "pyarrow<26"],
    },
)
