r"""Wan 2.1 text-to-video (Wan2.1-T2V-1.3B / 14B, diffusers format) with sparse attention.

    # offline smoke run on a CPU: tiny random transformer, tune, then generate sparse
    python evaluate/wan_example.py --tiny --tune --use_spas_sage_attn

    # a real checkpoint (a local diffusers directory; nothing is downloaded)
    python evaluate/wan_example.py --model_path /ckpt/MODEL --tune \
        --model_out_path wan.pt
    python evaluate/wan_example.py --model_path /ckpt/MODEL --use_spas_sage_attn \
        --model_out_path wan.pt

See evaluate/_common.py for every flag and docs/diffusers.md for the method.
"""

from _common import main

if __name__ == "__main__":
    main("wan")
