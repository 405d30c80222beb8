from setuptools import find_packages, setup

setup(
    name="dsal-tf",
    version="0.1.0",
    description="Label-efficient medical image segmentation with deeply supervised active learning (Keras 3 / TF)",
    packages=find_packages(include=["dsal_tf", "dsal_tf.*"]),
    python_requires=">=3.10",
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.0",
        "opencv-python-headless>=4.8",
        "scikit-image>=0.21",
        "numpy>=1.24",
        "click>=8.1",
        "scipy>=1.10",
        "pandas>=2.0",
        "matplotlib>=3.7",
        "tqdm>=4.65",
        "nibabel>=5.0",  # NIfTI volumes (dsal_tf/volumes.py)
    ],
    extras_require={
        "test": ["pytest>=7.4", "pytest-xdist>=3.5", "hypothesis>=6.100", "pydensecrf2", "label-studio-sdk>=1.0",
                 "tf2onnx>=1.16", "onnxruntime>=1.17"],
        "crf": ["pydensecrf2"],
        "labelstudio": ["label-studio-sdk>=1.0"],  # brush RLE for Label Studio tasks and imports
        "onnx": ["tf2onnx>=1.16", "onnxruntime>=1.17"],  # dsal export --format onnx (and checking it)
    },
    entry_points={"console_scripts": ["dsal=dsal_tf.cli:cli"]},
)
