"""Data: file formats -> Conversation; chat templates -> (input_ids, loss_mask); mixing and packing."""

from chatsmith.data.conversation import Conversation, Message

__all__ = ["Conversation", "Message"]
