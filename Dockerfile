FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY backflow backflow
COPY topics topics
COPY pipeline pipeline
COPY connectors connectors
RUN pip install --no-cache-dir .
CMD ["backflow", "--help"]
