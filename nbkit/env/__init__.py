"""Where we run: the runtime (Colab/Kaggle/local, the GPU, bf16 by compute capability, the precision rule, the known
GPUs, the model choice, the T4 rehearsal) and Colab/Kaggle/Drive folders and the runtime check.

Modules: colab, runtime. Import them by name (`from nbkit.env import colab`); this file imports
nothing, so importing one module never loads the others.
"""
