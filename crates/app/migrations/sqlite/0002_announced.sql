-- The status last published to the order's live channel: the worker
-- publishes every order whose status differs and then records it, so a
-- crash between the two republishes (at least once) instead of losing it.
ALTER TABLE orders ADD COLUMN announced TEXT NOT NULL DEFAULT '';
CREATE INDEX orders_unannounced ON orders (id) WHERE status <> announced;
