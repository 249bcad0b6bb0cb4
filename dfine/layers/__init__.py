"""Building blocks shared by the models (one copy each).

    conv.py                  ConvNormAct, RepVGG, CSP blocks of the hybrid encoders
    deformable_attention.py  multi-scale deformable attention
    mlp.py                   MLP heads
    position_embedding.py    2D sine-cosine position embedding
"""
