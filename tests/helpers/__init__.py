"""What the tests share: isolated processes, a real MLflow server, a fresh PostgreSQL database."""
