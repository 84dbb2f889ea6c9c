"""LlamaBoard's labels and help texts for the MoFaSGD accordion, in English and Chinese.

Keys are the accordion's element names (LlamaBoard looks labels up by element name, per language). Languages
LlamaBoard offers beyond these two show the English text (:func:`llamafactory_mfsgd.webui.patch_locales`).
"""

from __future__ import annotations

LOCALES: dict[str, dict[str, dict[str, str]]] = {
    "mfsgd_tab": {
        "en": {"label": "MoFaSGD configurations"},
        "zh": {"label": "MoFaSGD 参数设置"},
    },
    "use_mfsgd": {
        "en": {
            "label": "Use MoFaSGD",
            "info": "Train with MoFaSGD: rank-r factored momentum for the hidden matrices (LoRA-sized optimizer "
            "memory), AdamW for embeddings, LM head and norms. Needs the `full` finetuning method.",
        },
        "zh": {
            "label": "使用 MoFaSGD",
            "info": "使用 MoFaSGD 优化器：隐藏层矩阵使用秩为 r 的分解动量（优化器显存与 LoRA 相当），"
            "词嵌入、LM head 和归一化层使用 AdamW。需要 `full` 微调方法。",
        },
    },
    "mfsgd_rank": {
        "en": {"label": "MoFaSGD rank", "info": "Rank r of the factored momentum of each matrix."},
        "zh": {"label": "MoFaSGD 秩", "info": "每个矩阵分解动量的秩 r。"},
    },
    "learning_rate_mfsgd": {
        "en": {
            "label": "MoFaSGD learning rate",
            "info": "Learning rate of the MoFaSGD matrices. Empty: the learning rate above.",
        },
        "zh": {"label": "MoFaSGD 学习率", "info": "MoFaSGD 矩阵的学习率。留空则使用上方的学习率。"},
    },
    "learning_rate_adamw": {
        "en": {
            "label": "AdamW-side learning rate",
            "info": "Learning rate of the embeddings, LM head and norms (AdamW). Empty: the learning rate above.",
        },
        "zh": {
            "label": "AdamW 部分学习率",
            "info": "词嵌入、LM head 和归一化层（AdamW 部分）的学习率。留空则使用上方的学习率。",
        },
    },
    "mfsgd_beta": {
        "en": {"label": "Momentum β", "info": "Decay β of the factored momentum, in [0, 1)."},
        "zh": {"label": "动量 β", "info": "分解动量的衰减系数 β，取值范围 [0, 1)。"},
    },
    "mfsgd_step_form": {
        "en": {
            "label": "Step form",
            "info": "1/S: U diag(1/S) Vᵀ (the authors' code); ones: U Vᵀ, the spectrally normalised step "
            "(the paper's).",
        },
        "zh": {
            "label": "更新形式",
            "info": "1/S：U diag(1/S) Vᵀ（作者代码的形式）；ones：U Vᵀ，谱归一化的更新（论文中的形式）。",
        },
    },
    "mfsgd_init": {
        "en": {
            "label": "Factor initialisation",
            "info": "weight: exact top-r SVD of W (the authors'); weight_randomized: randomized SVD of W (a fast "
            "start); gradient: subspaces of the first gradient.",
        },
        "zh": {
            "label": "因子初始化",
            "info": "weight：W 的精确前 r 阶奇异值分解（作者的做法）；weight_randomized：W 的随机化奇异值分解"
            "（启动更快）；gradient：取首个梯度的子空间。",
        },
    },
    "mfsgd_adamw_side": {
        "en": {
            "label": "AdamW-side preset",
            "info": "none: mfsgd_adamw_state and mfsgd_fused_adamw_side as in Extra arguments (default full, "
            "false); authors: AdamW's full state; compact: factored second moment, updated in the gradient hooks "
            "(LoRA-level memory).",
        },
        "zh": {
            "label": "AdamW 部分预设",
            "info": "none：使用额外参数中的 mfsgd_adamw_state 和 mfsgd_fused_adamw_side（默认 full、false）；"
            "authors：完整的 AdamW 状态；compact：分解的二阶矩，在梯度钩子中更新（显存与 LoRA 相当）。",
        },
    },
    "mfsgd_stochastic_rounding": {
        "en": {
            "label": "Stochastic rounding",
            "info": "Round bf16 weight updates stochastically (unbiased). auto: on for bf16 weights (pure_bf16); "
            "fp32 weights are never rounded.",
        },
        "zh": {
            "label": "随机舍入",
            "info": "对 bf16 权重的更新进行随机舍入（无偏）。auto：bf16 权重（pure_bf16）时开启；fp32 权重不受影响。",
        },
    },
    "mfsgd_fused": {
        "en": {
            "label": "Fused (memory-lean)",
            "info": "Project each gradient in its backward hook and free it at once (LoRA-like memory). Turn off "
            "for fp16 training.",
        },
        "zh": {
            "label": "融合模式（省显存）",
            "info": "在反向传播钩子中投影每个梯度并立即释放（显存与 LoRA 相当）。fp16 训练时需关闭。",
        },
    },
    "mfsgd_target": {
        "en": {
            "label": "MoFaSGD modules",
            "info": "Names of the modules trained with MoFaSGD, comma-separated, or all (every hidden matrix).",
        },
        "zh": {
            "label": "MoFaSGD 作用模块",
            "info": "使用 MoFaSGD 训练的模块名称，用英文逗号分隔；all 表示所有隐藏层矩阵。",
        },
    },
}
