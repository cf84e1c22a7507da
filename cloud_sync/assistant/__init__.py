"""The maintenance assistant (docs/assistant.md): questions a workshop asks, answered from the fleet database and the
maintenance knowledge base, with the rows and documents each answer used. No cloud AI service; nothing made up.

    kb = KnowledgeBase(cfg.assistant.kb_dirs, cfg.assistant.index_path)
    answer = Assistant(db, kb, cfg.assistant.season_start).ask("what is wrong with harvester 7?")
    answer.answer, answer.intent, answer.slots, answer.sources, answer.clarify, answer.to_json()
"""

from cloud_sync.assistant.answer import Answer, Source
from cloud_sync.assistant.core import Assistant
from cloud_sync.assistant.kb import KnowledgeBase
from cloud_sync.assistant.understand import INTENTS

__all__ = ["INTENTS", "Answer", "Assistant", "KnowledgeBase", "Source"]
