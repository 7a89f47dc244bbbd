"""VM image service: image lifecycle over RabbitMQ and PostgreSQL."""
