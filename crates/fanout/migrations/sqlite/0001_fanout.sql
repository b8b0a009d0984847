-- One row per channel: its epoch (new when the log is created, so offsets
-- from a lost log are never mistaken for this one's) and its last offset.
CREATE TABLE fanout_channels (
    channel TEXT PRIMARY KEY,
    epoch TEXT NOT NULL,
    last_offset INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE fanout_messages (
    channel TEXT NOT NULL,
    offset INTEGER NOT NULL,
    at_ms INTEGER NOT NULL,
    payload BLOB NOT NULL,
    PRIMARY KEY (channel, offset)
) WITHOUT ROWID;
