"""Sentiment of a Chinese review: positive or negative."""

from __future__ import annotations

from lingtune.tasks.base import ClassificationTask


class Sentiment(ClassificationTask):
    name = "sentiment"
    title = "情感分类"
    instruction = '判断这条评论的情感倾向。只输出 JSON：{"label": "positive"} 或 {"label": "negative"}。'
    labels = ("positive", "negative")
    aliases = {
        "positive": ("positive", "pos", "1", "+1", "正面", "积极", "正向", "好评"),
        "negative": ("negative", "neg", "0", "-1", "负面", "消极", "负向", "差评"),
    }
