"""Our own minimal protobuf schema for WhatsApp history sync (only the fields we read).

Built at import time with ``descriptor_pb2`` instead of a ``.proto`` file: no
``protoc`` at build time and no generated module to keep in step, and the
schema below is the whole contract, readable in one place. Field numbers
are WhatsApp's wire numbers (docs/connectors.md, BRIEF section 7); names are
ours. Every field is ``optional`` (proto2), so a message missing what
WhatsApp marks required still parses, and enums are declared as integers so
an enum value we do not know is a number, never a parse error. Fields we do
not declare land in the unknown-field set and are counted, never fatal;
``ContextInfo.quotedMessage`` is left undeclared on purpose, so a quoted
message is never parsed.
"""

from __future__ import annotations

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import Message as ProtoMessage

F = descriptor_pb2.FieldDescriptorProto
STRING, BOOL, U32, U64, I64, DOUBLE, BYTES, MSG = (
    F.TYPE_STRING,
    F.TYPE_BOOL,
    F.TYPE_UINT32,
    F.TYPE_UINT64,
    F.TYPE_INT64,
    F.TYPE_DOUBLE,
    F.TYPE_BYTES,
    F.TYPE_MESSAGE,
)
PACKAGE = "backflow.wa"

# message name -> [(field name, number, type, repeated, message type name)]
_Field = tuple[str, int, int, bool, str]


def _f(name: str, number: int, kind: int, repeated: bool = False, ref: str = "") -> _Field:
    return (name, number, kind, repeated, ref)


_MEDIA_CTX = _f("context_info", 17, MSG, ref="ContextInfo")

SCHEMA: dict[str, list[_Field]] = {
    "HistorySync": [
        _f("sync_type", 1, U32),
        _f("conversations", 2, MSG, True, "Conversation"),
        _f("pushnames", 7, MSG, True, "Pushname"),
        _f("pn_lid_mappings", 15, MSG, True, "PnLidMapping"),
    ],
    "Pushname": [_f("id", 1, STRING), _f("pushname", 2, STRING)],
    "PnLidMapping": [_f("pn_jid", 1, STRING), _f("lid_jid", 2, STRING)],
    "Conversation": [
        _f("id", 1, STRING),
        _f("messages", 2, MSG, True, "HistorySyncMsg"),
        _f("last_msg_timestamp", 5, U64),
        _f("unread_count", 6, U32),
        _f("ephemeral_expiration", 9, U32),
        _f("end_of_history_transfer_type", 11, U32),
        _f("name", 13, STRING),
        _f("archived", 16, BOOL),
        _f("marked_as_unread", 19, BOOL),
        _f("participant", 20, MSG, True, "GroupParticipant"),
        _f("pinned", 24, U32),
        _f("mute_end_time", 25, U64),
        _f("display_name", 38, STRING),
        _f("pn_jid", 39, STRING),
        _f("lid_jid", 42, STRING),
    ],
    "GroupParticipant": [_f("user_jid", 1, STRING), _f("rank", 2, U32)],
    "HistorySyncMsg": [_f("message", 1, MSG, ref="WebMessageInfo"), _f("msg_order_id", 2, U64)],
    "WebMessageInfo": [
        _f("key", 1, MSG, ref="MessageKey"),
        _f("message", 2, MSG, ref="Message"),
        _f("message_timestamp", 3, U64),
        _f("status", 4, U32),
        _f("participant", 5, STRING),
        _f("push_name", 19, STRING),
        _f("message_stub_type", 24, U32),
        _f("message_stub_parameters", 26, STRING, True),
        _f("reactions", 41, MSG, True, "Reaction"),
        _f("original_self_author", 51, STRING),
        _f("comment_metadata", 59, MSG, ref="CommentMetadata"),
    ],
    "CommentMetadata": [_f("comment_parent_key", 1, MSG, ref="MessageKey")],
    "MessageKey": [
        _f("remote_jid", 1, STRING),
        _f("from_me", 2, BOOL),
        _f("id", 3, STRING),
        _f("participant", 4, STRING),
    ],
    "Reaction": [
        _f("key", 1, MSG, ref="MessageKey"),
        _f("text", 2, STRING),
        _f("sender_timestamp_ms", 4, I64),
    ],
    "Message": [
        _f("conversation", 1, STRING),
        _f("image", 3, MSG, ref="ImageMessage"),
        _f("contact", 4, MSG, ref="ContactMessage"),
        _f("location", 5, MSG, ref="LocationMessage"),
        _f("extended_text", 6, MSG, ref="ExtendedTextMessage"),
        _f("document", 7, MSG, ref="DocumentMessage"),
        _f("audio", 8, MSG, ref="AudioMessage"),
        _f("video", 9, MSG, ref="VideoMessage"),
        _f("protocol", 12, MSG, ref="ProtocolMessage"),
        _f("contacts_array", 13, MSG, ref="ContactsArrayMessage"),
        _f("live_location", 18, MSG, ref="LocationMessage"),
        _f("sticker", 26, MSG, ref="StickerMessage"),
        _f("device_sent", 31, MSG, ref="DeviceSentMessage"),
        _f("view_once", 37, MSG, ref="FutureProofMessage"),
        _f("ephemeral", 40, MSG, ref="FutureProofMessage"),
        _f("reaction", 46, MSG, ref="Reaction"),
        _f("poll_creation", 49, MSG, ref="PollCreationMessage"),
        _f("poll_update", 50, MSG, ref="Empty"),
        _f("document_with_caption", 53, MSG, ref="FutureProofMessage"),
        _f("view_once_v2", 55, MSG, ref="FutureProofMessage"),
        _f("edited", 58, MSG, ref="FutureProofMessage"),
        _f("view_once_v2_extension", 59, MSG, ref="FutureProofMessage"),
        _f("poll_creation_v2", 60, MSG, ref="PollCreationMessage"),
        _f("poll_creation_v3", 64, MSG, ref="PollCreationMessage"),
        _f("ptv", 66, MSG, ref="VideoMessage"),
        _f("bot_invoke", 67, MSG, ref="FutureProofMessage"),
        _f("lottie_sticker", 74, MSG, ref="FutureProofMessage"),
        _f("associated_child", 91, MSG, ref="FutureProofMessage"),
    ],
    "Empty": [],
    "FutureProofMessage": [_f("message", 1, MSG, ref="Message")],
    "DeviceSentMessage": [_f("destination_jid", 1, STRING), _f("message", 2, MSG, ref="Message")],
    "ExtendedTextMessage": [_f("text", 1, STRING), _MEDIA_CTX],
    "ContextInfo": [
        _f("stanza_id", 1, STRING),
        _f("participant", 2, STRING),
        _f("mentioned_jid", 15, STRING, True),
    ],
    "ImageMessage": [
        _f("mimetype", 2, STRING),
        _f("caption", 3, STRING),
        _f("file_length", 5, U64),
        _f("height", 6, U32),
        _f("width", 7, U32),
        _MEDIA_CTX,
    ],
    "VideoMessage": [
        _f("mimetype", 2, STRING),
        _f("file_length", 4, U64),
        _f("seconds", 5, U32),
        _f("caption", 7, STRING),
        _f("height", 9, U32),
        _f("width", 10, U32),
        _MEDIA_CTX,
    ],
    "AudioMessage": [
        _f("mimetype", 2, STRING),
        _f("file_length", 4, U64),
        _f("seconds", 5, U32),
        _f("ptt", 6, BOOL),
        _MEDIA_CTX,
    ],
    "DocumentMessage": [
        _f("mimetype", 2, STRING),
        _f("title", 3, STRING),
        _f("file_length", 5, U64),
        _f("file_name", 8, STRING),
        _f("caption", 20, STRING),
        _MEDIA_CTX,
    ],
    "StickerMessage": [
        _f("mimetype", 5, STRING),
        _f("height", 6, U32),
        _f("width", 7, U32),
        _f("file_length", 9, U64),
        _MEDIA_CTX,
    ],
    "LocationMessage": [
        _f("degrees_latitude", 1, DOUBLE),
        _f("degrees_longitude", 2, DOUBLE),
        _f("name", 3, STRING),
        _f("address", 4, STRING),
        _MEDIA_CTX,
    ],
    "ContactMessage": [_f("display_name", 1, STRING), _f("vcard", 16, STRING), _MEDIA_CTX],
    "ContactsArrayMessage": [
        _f("display_name", 1, STRING),
        _f("contacts", 2, MSG, True, "ContactMessage"),
        _MEDIA_CTX,
    ],
    "ProtocolMessage": [
        _f("key", 1, MSG, ref="MessageKey"),
        _f("type", 2, U32),
        _f("edited_message", 14, MSG, ref="Message"),
    ],
    "PollCreationMessage": [
        _f("name", 2, STRING),
        _f("options", 3, MSG, True, "PollOption"),
        _MEDIA_CTX,
    ],
    "PollOption": [_f("option_name", 1, STRING)],
}


def _build() -> dict[str, type[ProtoMessage]]:
    file = descriptor_pb2.FileDescriptorProto(
        name="backflow/whatsapp_history.proto", package=PACKAGE, syntax="proto2"
    )
    for name, fields in SCHEMA.items():
        message = file.message_type.add(name=name)
        for field_name, number, kind, repeated, ref in fields:
            field = message.field.add(name=field_name, number=number, type=kind)
            field.label = F.LABEL_REPEATED if repeated else F.LABEL_OPTIONAL
            if ref:
                field.type_name = f".{PACKAGE}.{ref}"
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    return {
        name: message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.{name}"))
        for name in SCHEMA
    }


CLASSES = _build()
HistorySync = CLASSES["HistorySync"]
Conversation = CLASSES["Conversation"]
HistorySyncMsg = CLASSES["HistorySyncMsg"]
WebMessageInfo = CLASSES["WebMessageInfo"]
Message = CLASSES["Message"]

# Message fields that only wrap another Message (unwrapped before anything else).
WRAPPERS = (
    "view_once",
    "ephemeral",
    "document_with_caption",
    "view_once_v2",
    "edited",
    "view_once_v2_extension",
    "bot_invoke",
    "lottie_sticker",
    "associated_child",
)
