"""Delivery and incident events for the ESP: a durable outbox drained to a signed webhook.

    event.py     what an event says (the public JSON shape); pure
    record.py    one outbox line: checksum + JSON; pure
    segments.py  the outbox's files: segment logs, the "sent up to" cursor (blocking)
    outbox.py    Outbox: group-committed appends, ordered reads, durable mark_sent, bound
    webhook.py   WebhookSender: batches, HMAC-SHA256 signature, retries with backoff
    log.py       EventLog: what the dispatcher and the app call (emit, start, stop)

Delivery is at least once; every event carries an `event_id` for the receiver to drop
duplicates.
"""
