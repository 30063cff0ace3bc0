r"""HunyuanVideo text-to-video (hunyuanvideo-community/HunyuanVideo) with sparse attention.

    # offline smoke run on a CPU: tiny random transformer, tune, then generate sparse
    python evaluate/hunyuan_example.py --tiny --tune --use_spas_sage_attn

    # a real checkpoint (a local diffusers directory; nothing is downloaded)
    python evaluate/hunyuan_example.py --model_path /ckpt/MODEL --tune \
        --model_out_path hunyuanvideo.pt
    python evaluate/hunyuan_example.py --model_path /ckpt/MODEL --use_spas_sage_attn \
        --model_out_path hunyuanvideo.pt

See evaluate/_common.py for every flag and docs/diffusers.md for the method.
"""

from _common import main

if __name__ == "__main__":
    main("hunyuanvideo")
