from pathlib import Path

from setuptools import find_packages, setup

# One import namespace, `mixzoo`, over the repository's top-level folders: backbones/ is `mixzoo`,
# ops/ is `mixzoo.ops`, checkpoints/ (the manifest, data only) is `mixzoo.checkpoints`. package_dir maps
# them for wheels and for PEP 660 editable installs alike (pyproject.toml selects that backend), so the
# checkout's files are what an editable install runs; nothing generic lands in site-packages.
PACKAGE_DIR = {'mixzoo': 'backbones', 'mixzoo.ops': 'ops', 'mixzoo.checkpoints': 'checkpoints'}
PACKAGES = [name + ('.' + sub if sub else '') for name, folder in PACKAGE_DIR.items()
            for sub in [''] + find_packages(folder)]

setup(
    name='mixzoo',
    version='0.1.0',
    description='Vision-backbone model zoo on shared token-mixer ops, registered in timm, '
                'with adapters for mmdet / mmseg',
    long_description=Path(__file__).with_name('README.md').read_text(encoding='utf-8'),
    long_description_content_type='text/markdown',
    packages=PACKAGES,
    package_dir=PACKAGE_DIR,
    # C kernels are compiled on first use (ops/_native.py), so their sources ship with the package;
    # the checkpoint manifest is read with importlib.resources (mixzoo._pretrained)
    package_data={'mixzoo.ops': ['*.h', '*.c', '*/*.c'], 'mixzoo.checkpoints': ['manifest.json']},
    python_requires='>=3.10',
    install_requires=[
        'torch>=2.4,<2.15',
        'torchvision>=0.19,<0.30',
        'timm>=1.0.20,<1.1',
        'safetensors>=0.4',
        'numpy',
    ],
    extras_require={
        # mmcv 2.1.0 must be compiled with its ops (mmcv-lite is not enough): tools/env.sh --mm
        # installs a prebuilt wheel where one matches, else builds it (see README, "Detection and segmentation")
        'mm': ['mmengine==0.10.7', 'mmcv==2.1.0', 'mmdet==3.3.0', 'mmsegmentation==1.2.2',
               'ftfy', 'regex', 'pycocotools', 'shapely', 'scipy', 'terminaltables'],
        'triton': ['triton>=3.0'],
        'dev': ['pytest>=8', 'pytest-xdist>=3'],
        # tools/export.py --format onnx and tests/test_export_onnx.py
        'deploy': ['onnx>=1.17,<1.24', 'onnxscript>=0.3,<0.8', 'onnxruntime>=1.20,<1.33'],
        # tools/benchmark.py's plots (tools/benchplots.py); without it the page says how to get them
        'plots': ['matplotlib>=3.8'],
    },
)
