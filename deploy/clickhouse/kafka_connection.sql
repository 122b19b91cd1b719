-- flowlens -> Kafka -> ClickHouse: where the topic is. Edit the brokers (and the group, if
-- several ClickHouse clusters read the topic), then run this once, before flowlens.sql.
-- With SASL/TLS, add kafka_security_protocol, kafka_sasl_mechanism, kafka_sasl_username and
-- kafka_sasl_password here, or keep the collection in the server's configuration instead
-- (named_collections in config.d/, README "Fleet: Kafka and ClickHouse"), where the password
-- stays out of query logs. Creating it with SQL needs the named_collection_control privilege.
CREATE NAMED COLLECTION IF NOT EXISTS flowlens_kafka AS
    kafka_broker_list = 'kafka1.example:9092,kafka2.example:9092',
    kafka_topic_list = 'flowlens-flows',
    kafka_group_name = 'clickhouse-flowlens';
