FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
COPY contracts ./contracts
RUN pip install --no-cache-dir ".[postgres]"
EXPOSE 8402
CMD ["tollway", "serve", "--host", "0.0.0.0"]
