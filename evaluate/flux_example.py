r"""Flux text-to-image (FLUX.1-dev / schnell) with sparse attention.

    # offline smoke run on a CPU: tiny random transformer, tune, then generate sparse
    python evaluate/flux_example.py --tiny --tune --use_spas_sage_attn

    # a real checkpoint (a local diffusers directory; nothing is downloaded)
    python evaluate/flux_example.py --model_path /ckpt/MODEL --tune \
        --model_out_path flux.pt
    python evaluate/flux_example.py --model_path /ckpt/MODEL --use_spas_sage_attn \
        --model_out_path flux.pt

See evaluate/_common.py for every flag and docs/diffusers.md for the method.
"""

from _common import main

if __name__ == "__main__":
    main("flux")
