"""PyTorch version of the seed MultiHeadSelfAttention (for parity tests only).

Imported only when torch is available.
"""
import math

import torch
from torch import nn


class MultiHeadSelfAttention(nn.Module):
    def __init__(self, d_model, num_heads):
        super().__init__()
        assert d_model % num_heads == 0
        self.d_model = d_model
        self.num_heads = num_heads
        self.head_size = d_model // num_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model)
        self.value = nn.Linear(d_model, d_model)
        self.fc = nn.Linear(d_model, d_model)

    def forward(self, x):
        B, N, D = x.size()
        H, hs = self.num_heads, self.head_size
        Q = self.query(x).view(B, N, H, hs).transpose(1, 2)
        K = self.key(x).view(B, N, H, hs).transpose(1, 2)
        V = self.value(x).view(B, N, H, hs).transpose(1, 2)
        scores = Q @ K.transpose(-2, -1) / math.sqrt(hs)
        attn = torch.softmax(scores, dim=-1)
        out = (attn @ V).transpose(1, 2).reshape(B, N, D)
        return self.fc(out)
